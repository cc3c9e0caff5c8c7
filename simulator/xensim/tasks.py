"""``Async.*`` calls: a task record, the call run on a worker thread, the outcome stored.

As in xapi, ``task.result`` is the XML-RPC text of the value (``<value>…</value>``) and
``error_info`` the ErrorDescription; clients poll ``task.get_status``.
"""

from __future__ import annotations

import logging
import threading
import xmlrpc.client
from collections.abc import Callable
from typing import Any

from . import records
from .database import Database
from .errors import ServerError
from .sessions import Sessions

log = logging.getLogger(__name__)


def result_text(value: Any) -> str:
    """xapi's string form of a task result: the marshalled XML-RPC value."""
    if value is None or value == "":
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = xmlrpc.client.dumps((value,), allow_none=True)
    start, end = text.index("<value>"), text.rindex("</value>") + len("</value>")
    return text[start:end].replace("<string>", "").replace("</string>", "")


class Tasks:
    """The API's tasks.  What they run is the caller's: ``has_method(method)`` says whether
    the API has the call, ``call(method, params, host)`` runs it (``Xapi`` passes its own;
    this module knows nothing of it)."""

    def __init__(
        self,
        db: Database,
        sessions: Sessions,
        has_method: Callable[[str], bool],
        call: Callable[[str, list, str], Any],
    ) -> None:
        self.db = db
        self.sessions = sessions
        self.has_method = has_method
        self.call = call

    def start(self, method: str, params: list, host: str) -> str:
        """Fail at once for what xapi checks before creating the task."""
        if not self.has_method(method) or method.startswith("session."):
            raise ServerError("MESSAGE_METHOD_UNKNOWN", f"Async.{method}")
        session = self.sessions.check(params[0] if params else None)
        with self.db.lock:
            rec = records.task(f"Async.{method}")
            rec["resident_on"] = host
            rec["_session"] = session.ref
            ref = self.db.add("task", rec)
            self.db.save()
        worker = threading.Thread(
            target=self._run, args=(ref, method, params, host), name=f"task {method}", daemon=True
        )
        worker.start()
        return ref

    def _run(self, ref: str, method: str, params: list, host: str) -> None:
        try:
            value = self.call(method, params, host)
            outcome = {"status": "success", "result": result_text(value)}
        except ServerError as e:
            outcome = {"status": "failure", "error_info": e.description}
        except Exception as e:  # a bug in the simulator: report it like xapi would
            log.exception("task %s failed", method)
            outcome = {"status": "failure", "error_info": ["INTERNAL_ERROR", str(e)]}
        self._settle(ref, outcome)

    def _settle(self, ref: str, outcome: dict) -> None:
        """A pending task's end (a task destroyed meanwhile stays gone)."""
        with self.db.lock:
            if self.db.exists("task", ref):
                task = self.db.get("task", ref)
                if task["status"] == "pending":
                    task.update(outcome, progress=1.0, finished=records.now_stamp())
                self.db.save()

    def create(self, label: str, description: str, call: Any) -> str:
        """A client-made task, e.g. to follow an HTTP import (``task_id=``)."""
        rec = records.task(label)
        rec.update(name_description=description, resident_on=call.host, _session=call.session)
        return self.db.add("task", rec)

    def for_request(self, given: str | None, label: str, host: str) -> tuple[str, bool]:
        """The task an HTTP handler reports to (xen-api ``ocaml/xapi/xapi_http.ml``
        ``with_context``): the client's ``task_id=``, else one made for the request and
        destroyed when it ends, so its outcome is lost to the client.  Returns (ref, owned)."""
        with self.db.lock:
            if given and self.db.exists("task", given):
                return given, False
            rec = records.task(label)
            rec["resident_on"] = host
            ref = self.db.add("task", rec)
            self.db.save()
            return ref, True

    def finish(self, ref: str, error: list[str] | None, result: Any = None) -> None:
        """``TaskHelper.complete`` / ``TaskHelper.failed`` for an HTTP handler's task."""
        if error:
            outcome = {"status": "failure", "error_info": [str(e) for e in error]}
        else:
            outcome = {"status": "success", "result": result_text(result)}
        self._settle(ref, outcome)

    def end_request(self, ref: str, owned: bool) -> None:
        if owned:
            with self.db.lock:
                if self.db.exists("task", ref):
                    self.db.remove("task", ref)
                    self.db.save()

    def destroy(self, ref: str) -> str:
        self.db.remove("task", ref)
        return ""

    def cancel(self, ref: str) -> str:
        task = self.db.get("task", ref)
        if task["status"] != "pending":
            raise ServerError("OPERATION_NOT_ALLOWED", "task is not pending")
        task.update(status="cancelled", finished=records.now_stamp())
        return ""
