"""From a validated request to the float32 matrix a model takes, or an error naming the row and feature.

The schema has already refused non-numbers and non-finite numbers; what needs the model's
spec is checked here: the feature count of list rows, the names of object rows and columns,
and -- by the pipeline's one rule (:mod:`pipeline.events`) -- that every value fits a float32
(``1e39`` is finite JSON but infinite to the model), that a categorical feature's value is one
of its codes, and that it stays finite after the model's standardisation. ``check_answers``
refuses a row whose probabilities still came out non-finite.

>>> from pipeline.spec import BUILTIN_SPECS
>>> from serving.schemas import PredictRequest
>>> spec = BUILTIN_SPECS["small"]
>>> to_matrix(PredictRequest(instances=[[0.5] * 10]), spec).shape
(1, 10)
>>> to_matrix(PredictRequest(instances=[[0.5] * 9]), spec)
Traceback (most recent call last):
...
serving.inputs.BadInput: instances[0]: expected 10 features (f0 .. f9), got 9
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.events import category_problems, feature_value_problem, probability_problems, standardisation_problems
from pipeline.spec import ModelSpec
from serving.schemas import ClassifyRequest, PredictRequest

Request = PredictRequest | ClassifyRequest


class BadInput(ValueError):
    """The request does not fit the model; the message names the row and feature."""


def to_matrix(
    request: Request, spec: ModelSpec, standardisation: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """The request's rows (a classify request's examples, each with the context's features) as a
    ``(rows, n_features)`` float32 array in the spec's feature order; with the model's ``(mean, std)``,
    only if every row stays finite after its standardisation."""
    if isinstance(request, ClassifyRequest):
        matrix = _rows([{**request.context, **example} for example in request.examples], spec, "examples")
    elif request.instances is not None:
        matrix = _rows(request.instances, spec, "instances")
    elif isinstance(request.inputs, Mapping):
        matrix = _columns(request.inputs, spec)
    else:
        assert request.inputs is not None  # the schema requires instances or inputs
        matrix = _rows(request.inputs, spec, "inputs")
    if spec.categorical:
        problems = category_problems(matrix, spec.cardinalities, spec.feature_names)
        if (i := _first(problems)) is not None:
            raise BadInput(f"{_row(request, i)}: {problems[i]}")
    if standardisation is not None:
        problems = standardisation_problems(matrix, *standardisation, spec.feature_names)
        if (i := _first(problems)) is not None:
            raise BadInput(f"{_row(request, i)}: {problems[i]}")
    return matrix


def check_answers(request: Request, probabilities: np.ndarray) -> None:
    """Raise :class:`BadInput` naming the first row whose probabilities are not finite (no JSON answer has them)."""
    problems = probability_problems(probabilities)
    if (i := _first(problems)) is not None:
        raise BadInput(f"{_row(request, i)}: {problems[i]}")


def _rows(rows: Sequence, spec: ModelSpec, field: str) -> np.ndarray:
    if not rows:
        raise BadInput(f"{field}: no rows")
    matrix = np.empty((len(rows), spec.n_features), np.float32)
    with np.errstate(over="ignore"):
        for i, row in enumerate(rows):
            if isinstance(row, Mapping):
                _check_names(row, spec, f"{field}[{i}]")
                matrix[i] = [row[name] for name in spec.feature_names]
            elif len(row) != spec.n_features:
                raise BadInput(f"{field}[{i}]: expected {spec.n_features} features ({_names(spec)}), got {len(row)}")
            else:
                matrix[i] = row
    if (at := _overflow(matrix)) is not None:
        i, j = at
        row, name = rows[i], spec.feature_names[j]
        where, value = (
            (f"{field}[{i}].{name}", row[name]) if isinstance(row, Mapping) else (f"{field}[{i}][{j}]", row[j])
        )
        raise BadInput(f"{where} {feature_value_problem(value)}")
    return matrix


def _columns(columns: Mapping[str, Sequence[float]], spec: ModelSpec) -> np.ndarray:
    _check_names(columns, spec, "inputs")
    lengths = {name: len(columns[name]) for name in spec.feature_names}
    if len(set(lengths.values())) != 1:
        shown = ", ".join(f"{name}: {n}" for name, n in list(lengths.items())[:6])
        raise BadInput(f"inputs: every column needs the same number of values, got {shown}")
    if not next(iter(lengths.values())):
        raise BadInput("inputs: the columns hold no values")
    with np.errstate(over="ignore"):
        matrix = np.array([columns[name] for name in spec.feature_names], np.float32).T
    if (at := _overflow(matrix)) is not None:
        i, name = at[0], spec.feature_names[at[1]]
        raise BadInput(f"inputs.{name}[{i}] {feature_value_problem(columns[name][i])}")
    return np.ascontiguousarray(matrix)


def _check_names(row: Mapping[str, object], spec: ModelSpec, where: str) -> None:
    missing = [name for name in spec.feature_names if name not in row]
    known = set(spec.feature_names)
    unknown = [name for name in row if name not in known]
    if missing or unknown:
        problems = [
            f"missing feature(s) {_list(missing)}" if missing else "",
            f"unknown feature(s) {_list(unknown)}" if unknown else "",
        ]
        raise BadInput(f"{where}: {'; '.join(p for p in problems if p)} (model {spec.name!r} has {_names(spec)})")


def _overflow(matrix: np.ndarray) -> tuple[int, int] | None:
    """Row and column of the first value that is finite JSON but not a finite float32, if any
    (for a float, the same test as :func:`~pipeline.events.feature_value_problem`, vectorised)."""
    if np.isfinite(matrix).all():
        return None
    i, j = np.argwhere(~np.isfinite(matrix))[0]
    return int(i), int(j)


def _first(problems: list[str | None]) -> int | None:
    return next((i for i, problem in enumerate(problems) if problem is not None), None)


def _row(request: Request, i: int) -> str:
    """Where row ``i`` is in the body, as the client wrote it."""
    if isinstance(request, ClassifyRequest):
        return f"examples[{i}]"
    if request.instances is not None:
        return f"instances[{i}]"
    return f"inputs[{i}]" if not isinstance(request.inputs, Mapping) else f"inputs (row {i} of the columns)"


def _names(spec: ModelSpec) -> str:
    names = spec.feature_names
    return f"{names[0]} .. {names[-1]}" if len(names) > 2 else ", ".join(names)


def _list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
