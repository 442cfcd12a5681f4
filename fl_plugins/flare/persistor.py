"""Server-side global model persistence for models described by a config dict or a registered method.

``PTFileModelPersistor`` (nvflare) keeps the last global model in ``FL_global_model.pt``; here the file is written
atomically (temp file, fsync, ``os.replace``) by a background thread from a copy taken at the save, so the next
round does not wait for the disk (see :class:`fl_plugins.flare.resume.ServerFiles`; flushed at the end of the run,
a failed write is raised at the next save or then). The best model is chosen and written by the controller
(:class:`fl_plugins.flare.controllers.BestModelSelection`). This subclass only builds the initial model, seeded,
from :func:`fl_plugins.models.factory.build_model` or :func:`fl_plugins.methods.build`, so that jobs are plain
JSON naming an installed class (no custom code in the job).
"""

from __future__ import annotations

from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

__all__ = ["ConfigModelPersistor"]


class ConfigModelPersistor(PTFileModelPersistor):
    """Args:
    model_config: the model config dict accepted by ``fl_plugins.models.factory.build_model`` (fine-tuning jobs),
        or None when ``method`` is given.
    exclude_regex: regex of state keys never persisted/sent (the method's site-kept and rebuilt state).
    method / method_config: a registered method (``fl_plugins.methods.build``) whose wire state is the global model
        (pretraining jobs: the keys of ``method.state_module().state_dict()``).
    imports: plugin modules to import first (methods registered outside the package).
    seed: the initial global model is built under ``torch.manual_seed(seed)`` (without touching the caller's RNG), so
        round 0 is the same in every run of the job.
    global_model_file_name / best_global_model_file_name: file names under the server app folder.
    """

    def __init__(
        self,
        model_config: dict[str, Any] | None = None,
        exclude_regex: str | None = None,
        method: str | None = None,
        method_config: dict[str, Any] | None = None,
        imports: list[str] | None = None,
        seed: int = 0,
        global_model_file_name: str = "FL_global_model.pt",
        best_global_model_file_name: str = "best_FL_global_model.pt",
    ) -> None:
        if (model_config is None) == (method is None):
            raise ValueError("ConfigModelPersistor needs exactly one of model_config and method")
        super().__init__(
            exclude_vars=exclude_regex,
            model=None,
            global_model_file_name=global_model_file_name,
            best_global_model_file_name=best_global_model_file_name,
        )
        self.model_config = dict(model_config) if model_config is not None else None
        self.exclude_regex = exclude_regex  # kept as a string for job export (the parent compiles it)
        self.method = method
        self.method_config = dict(method_config or {})
        self.imports = list(imports or [])
        self.seed = int(seed)
        self.model = None

    def build_global_model(self) -> Any:
        """The module whose ``state_dict`` (less ``exclude_regex``) is the initial global model (built seeded)."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._build()

    def _build(self) -> Any:
        if self.model_config is not None:
            from fl_plugins.models.factory import build_model

            return build_model(self.model_config)
        from fl_plugins.methods import build, import_plugins

        import_plugins(self.imports)
        method = build(self.method, self.method_config)
        return method.state_module() if hasattr(method, "state_module") else method

    def save_model_file(self, save_path: str) -> None:
        """nvflare's write of the persisted dict, done later by a background thread on a copy taken now."""
        import copy

        from fl_plugins.engine.checkpoint import BackgroundSaver

        if getattr(self, "_files", None) is None:
            self._files = BackgroundSaver("global-model-file")
        self._files.save(copy.deepcopy(self.persistence_manager.to_persistence_dict()), save_path)

    def flush(self) -> None:
        """Wait until the saved model files are on disk."""
        if getattr(self, "_files", None) is not None:
            self._files.flush()

    def handle_event(self, event: str, fl_ctx: FLContext) -> None:
        if event == EventType.END_RUN:
            self.flush()
        if event == EventType.START_RUN and self.model is None:
            try:
                self.model = self.build_global_model()
            except Exception as e:
                self.system_panic(reason=f"cannot build the global model ({'method ' + repr(self.method) if self.method else 'model_config'}): {e}", fl_ctx=fl_ctx)
                return
        super().handle_event(event, fl_ctx)
