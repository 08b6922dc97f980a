"""Running mapsim from Python: load a spec, run it, get its results.

>>> import mapsim
>>> spec = mapsim.load_spec("examples/quickstart.yaml")    # doctest: +SKIP
>>> res = mapsim.run(spec, out="results/qs", progress=False)  # doctest: +SKIP
>>> res.summary.head()                                      # doctest: +SKIP

A spec is a file (YAML, TOML or JSON), a dict of the same fields, or a spec already loaded.
Relative paths inside it (images, weights, ``output.dir``) resolve against the spec file's
folder, or for a dict against ``base_dir`` (default: the current directory when it is
loaded). The command line ``mapsim run`` goes through :func:`run`.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from mapsim.errors import SpecError
from mapsim.results import Results, open_results
from mapsim.spec import run_spec

if TYPE_CHECKING:  # pragma: no cover
    from mapsim.observers import RunObserver

__all__ = ["SpecLike", "load_spec", "run", "spec_base_dir"]

#: what :func:`load_spec` and :func:`run` take: a spec file's path, a dict of spec fields,
#: or a spec :func:`load_spec` returned (a pydantic ``RunSpec``)
SpecLike = str | os.PathLike | Mapping[str, Any] | BaseModel

#: id(loaded spec) -> the folder its relative paths resolve against (dropped with the spec)
_BASE_DIRS: dict[int, Path] = {}


def _remember(spec: BaseModel, base_dir: Path) -> None:
    key = id(spec)
    if key not in _BASE_DIRS:
        weakref.finalize(spec, _BASE_DIRS.pop, key, None)
    _BASE_DIRS[key] = base_dir


def _is_run_spec(value: Any) -> bool:
    return isinstance(value, BaseModel) and type(value).__name__ == "RunSpec"


def load_spec(spec: SpecLike, *, base_dir: str | os.PathLike[str] | None = None) -> BaseModel:
    """Read and validate a run spec.

    :param spec: a path to a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file; a dict with
        the fields of a spec (validated exactly like a file, errors name ``<dict>``); or a
        spec this function returned before (given back as it is).
    :param base_dir: the folder relative paths inside the spec resolve against, remembered
        with the spec for :func:`run`. Default: the file's folder; for a dict, the current
        directory.
    :returns: the validated ``RunSpec`` (a pydantic model: ``spec.models``,
        ``spec.output``, ``spec.model_dump()``...).
    :raises mapsim.SpecError: the file cannot be read or parsed, or the spec is not valid;
        the message has one line per problem with the field's path
        (``aggregators.0.value: ...``).
    """
    base = Path(base_dir).resolve() if base_dir is not None else None
    if _is_run_spec(spec):
        loaded = spec
        if base is not None:
            _remember(loaded, base)
        return loaded  # type: ignore[return-value]
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        loaded = run_spec.load_spec(path)
        _remember(loaded, base or path.resolve().parent)
        return loaded
    if isinstance(spec, Mapping):
        loaded = run_spec.validate_spec(dict(spec), "<dict>")
        _remember(loaded, base or Path.cwd())
        return loaded
    what = type(spec).__name__
    hint = " (a training spec? use `mapsim train`)" if isinstance(spec, BaseModel) else ""
    raise SpecError(
        f"load_spec takes a spec file's path, a dict of spec fields or a loaded run spec; "
        f"got a {what}{hint}"
    )


def spec_base_dir(spec: BaseModel) -> Path:
    """The folder relative paths inside a loaded spec resolve against (see :func:`load_spec`;
    the current directory for a spec not loaded through it)."""
    return _BASE_DIRS.get(id(spec), Path.cwd())


def run(spec: SpecLike, out: str | os.PathLike[str] | None = None, *,
        device: str | None = None, overwrite: bool = False, resume: bool = False,
        progress: bool = True, plots: bool | None = None,
        base_dir: str | os.PathLike[str] | None = None) -> Results:
    """Run a spec and write its results directory; return the results, opened.

    :param spec: a spec file's path, a dict of spec fields or a loaded spec (:func:`load_spec`).
    :param out: the results directory. Default: the spec's ``output.dir`` (relative to the
        spec's folder), else ``results/<name>`` in the current directory. A relative ``out``
        is relative to the current directory.
    :param device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"``; default: the
        spec's ``device``.
    :param overwrite: replace a results directory that is not empty (otherwise it is an
        error and nothing is touched).
    :param resume: skip the blocks of images an interrupted run of the same spec finished.
    :param progress: show a progress bar (on stderr).
    :param plots: draw ``plots/`` (and ``report.html`` when the spec's ``output.report``):
        None follows the spec's ``output.plots``/``output.report``; True or False decides.
    :param base_dir: where relative paths inside the spec resolve (see :func:`load_spec`);
        default: the spec file's folder, or the current directory for a dict.
    :returns: the :class:`~mapsim.Results` of the run. Under torchrun every process returns
        them once rank 0 has written them; a process that cannot see rank 0's files (no
        shared file system) gets them with an empty ``info``.
    :raises mapsim.SpecError: the spec is not valid. Other :class:`~mapsim.MapsimError`
        subclasses say what could not be built, read or written (nothing half-written is
        left behind).
    """
    from mapsim.runner.run import run as run_spec_now

    loaded = load_spec(spec, base_dir=base_dir)
    base = Path(base_dir).resolve() if base_dir is not None else spec_base_dir(loaded)
    result = run_spec_now(
        loaded,
        base_dir=base,
        out_dir=out,
        device=device,
        overwrite=overwrite,
        resume=resume,
        progress=progress,
        observers=_observers(loaded.output, plots, progress),
    )
    if not result.info and not (Path(result.out_dir) / "run.json").is_file():
        # a torchrun process other than rank 0 that does not see rank 0's files (no shared
        # file system): the results' place, without run.json
        return Results(Path(result.out_dir), {})
    return open_results(result.out_dir)


def _observers(output: Any, plots: bool | None, progress: bool = False) -> list[RunObserver]:
    """A :class:`~mapsim.plots.observer.PlotObserver` when pictures are wanted (matplotlib is
    imported only then)."""
    wanted = bool(output.plots or output.report) if plots is None else plots
    if not wanted:
        return []
    from mapsim.plots.observer import observers_for

    return observers_for(output, plots=True, progress=progress)
