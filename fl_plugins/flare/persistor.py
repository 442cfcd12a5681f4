"""Server-side global model persistence for models described by a config dict.

``PTFileModelPersistor`` (nvflare) already writes ``FL_global_model.pt`` (last) and ``best_FL_global_model.pt``
(when ``IntimeModelSelector`` reports a new best validation metric) atomically (temp file + ``os.replace``).
This subclass only builds the initial model from :func:`fl_plugins.models.factory.build_model` so that jobs are
plain JSON naming an installed class (no custom code in the job).
"""

from __future__ import annotations

from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

__all__ = ["ConfigModelPersistor"]


class ConfigModelPersistor(PTFileModelPersistor):
    """Args:
    model_config: the model config dict accepted by ``fl_plugins.models.factory.build_model``.
    exclude_regex: regex of state keys never persisted/sent (e.g. site-local heads).
    global_model_file_name / best_global_model_file_name: file names under the server app folder.
    """

    def __init__(
        self,
        model_config: dict[str, Any],
        exclude_regex: str | None = None,
        global_model_file_name: str = "FL_global_model.pt",
        best_global_model_file_name: str = "best_FL_global_model.pt",
    ) -> None:
        super().__init__(
            exclude_vars=exclude_regex,
            model=None,
            global_model_file_name=global_model_file_name,
            best_global_model_file_name=best_global_model_file_name,
        )
        self.model_config = dict(model_config)
        self.exclude_regex = exclude_regex  # kept as a string for job export (the parent compiles it)
        self.model = None

    def handle_event(self, event: str, fl_ctx: FLContext) -> None:
        if event == EventType.START_RUN and self.model is None:
            from fl_plugins.models.factory import build_model

            try:
                self.model = build_model(self.model_config)
            except Exception as e:
                self.system_panic(reason=f"cannot build the global model from model_config: {e}", fl_ctx=fl_ctx)
                return
        super().handle_event(event, fl_ctx)
