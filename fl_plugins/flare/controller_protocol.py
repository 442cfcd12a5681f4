"""What a server workflow named in a job's ``fl.controller`` must accept: :class:`ControllerClass`.

The job builder (:func:`fl_plugins.flare.jobs.assembly.build_fedavg_job`) builds the controller of every job of the
FedAvg family as ``CONTROLLERS[fl.controller](**kwargs)`` with the keyword arguments of :data:`JOB_CONTROLLER_KWARGS`
(``resume_from`` only when the job resumes a crashed run) plus the family's own (``controller_args``, e.g. FCL's
``feature_dim``). :func:`missing_controller_kwargs` says which of them a class does not take, following ``**kwargs``
up its MRO as cooperative ``super().__init__(**kwargs)`` calls pass them on.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

__all__ = ["ControllerClass", "JOB_CONTROLLER_KWARGS", "OPTIONAL_CONTROLLER_KWARGS", "accepted_kwargs",
           "missing_controller_kwargs"]

#: The keyword arguments ``build_fedavg_job`` passes to every controller (``fl.*`` settings, see FLSettings).
JOB_CONTROLLER_KWARGS: tuple[str, ...] = ("num_clients", "num_rounds", "persistor_id", "task_check_period",
                                          "aggregator", "key_metric", "round_timeout", "memory_gc_rounds")
#: The ones it passes only sometimes (``resume_from``: when ``fl.resume_from`` is set).
OPTIONAL_CONTROLLER_KWARGS: tuple[str, ...] = ("resume_from",)


@runtime_checkable
class ControllerClass(Protocol):
    """A class a job may name in ``fl.controller`` (a value of ``fl_plugins.flare.job_builder.CONTROLLERS``): called
    with these keyword arguments it returns an nvflare ``ModelController`` (the job's server workflow).

    Args:
        num_clients: the minimum number of connected sites a round needs (the job's ``fl.min_clients``).
        num_rounds: FL rounds (``fl.num_rounds``).
        persistor_id: component id of the global model's persistor (``"persistor"``).
        task_check_period: seconds between checks of the standing tasks (``fl.task_check_period``).
        aggregator: a ``ModelAggregator`` following the validation contract of :mod:`fl_plugins.flare.aggregators`.
        key_metric: the site metric that picks the best global model (``fl.key_metric``).
        round_timeout: seconds a site may take to answer a task (``fl.round_timeout``; 0 = no limit).
        memory_gc_rounds: rounds between the server's memory clean-ups (``fl.server_memory_gc_rounds``; 0 = off).
        resume_from: a ``round_checkpoint.pt`` to resume from (``fl.resume_from``; passed only when set).
        kwargs: the job family's own arguments (``controller_args``).
    """

    def __call__(self, *, num_clients: int, num_rounds: int, persistor_id: str, task_check_period: float,
                 aggregator: Any, key_metric: str | None, round_timeout: int, memory_gc_rounds: int,
                 resume_from: str | None = None, **kwargs: Any) -> Any: ...


def accepted_kwargs(cls: type) -> set[str]:
    """The keyword argument names ``cls(...)`` accepts, following ``**kwargs`` up the MRO: the ``__init__`` of
    ``cls``, then, while the one just read takes ``**kwargs`` (and so passes them on with ``super().__init__``), the
    next ``__init__`` defined further up the MRO (``object.__init__``, which takes none, ends the chain).

    Raises:
        TypeError: ``cls`` is not a class.
    """
    if not inspect.isclass(cls):
        raise TypeError(f"cls must be a class, got {cls!r}")
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())
        names |= {p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def missing_controller_kwargs(cls: type) -> list[str]:
    """The names of :data:`JOB_CONTROLLER_KWARGS` and :data:`OPTIONAL_CONTROLLER_KWARGS` that ``cls`` does not
    accept (:func:`accepted_kwargs`), in that order; empty: ``cls`` takes every keyword argument of
    :class:`ControllerClass`.

    Raises:
        TypeError: ``cls`` is not a class.
    """
    names = accepted_kwargs(cls)
    return [k for k in (*JOB_CONTROLLER_KWARGS, *OPTIONAL_CONTROLLER_KWARGS) if k not in names]
