"""Validating a document against a spec model, with messages that name each field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from mapsim.errors import SpecError, closest_matches
from mapsim.spec.run_spec import format_validation_error


def validate_document(model: type[BaseModel], data: dict[str, Any], source: str,
                      kind: str) -> Any:
    """``model`` validated from ``data``; a :class:`SpecError` with one line per problem.

    Unknown top-level fields are reported first, each with the closest field and the list of
    the ``kind`` spec's fields (e.g. ``kind="training"``: "the training spec is not valid").
    """
    known = list(model.model_fields)
    unknown = [key for key in data if key not in known]
    if unknown:
        lines = [f"{source}: the {kind} spec is not valid ({len(unknown)} problem(s)):"]
        for key in unknown:
            matches = closest_matches(str(key), known)
            near = f"did you mean {matches[0]!r}? " if matches else ""
            lines.append(f"  {key}: unknown field; {near}the fields of a {kind} spec are: "
                         f"{', '.join(known)}")
        raise SpecError("\n".join(lines))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc, source, data)
        raise SpecError(message.replace("the spec is not valid",
                                        f"the {kind} spec is not valid")) from None
