"""JSON Schema validation, in one place (the protocol, the run and fidelity records, the workflow's protocol blocks):
the jsonschema package, and the error of a document against its schema."""
from __future__ import annotations


def jsonschema():
    """The jsonschema package, imported on first use: commands that validate nothing (and test collection)
    run without it; on a machine without a package index it comes from the wheelhouse (README, GPU)."""
    try:
        import jsonschema as package
    except ImportError as exc:
        raise ImportError(f"barkbench validates results with the package 'jsonschema', not importable here ({exc}): "
                          "pip install jsonschema, or without a package index install the wheelhouse that "
                          "envs/gpu-wheelhouse.sh prepares (README, On a GPU node)") from None
    return package


def errors(data, schema: dict, strict_integers: bool = False) -> list:
    """Every way `data` does not fit `schema` (JSON Schema 2020-12), as jsonschema errors. `strict_integers`:
    an integer is an `int`, never a float with an integral value (2.0)."""
    package = jsonschema()
    validator = package.Draft202012Validator
    if strict_integers:
        checker = validator.TYPE_CHECKER.redefine(
            "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
        validator = package.validators.extend(validator, type_checker=checker)
    return list(validator(schema).iter_errors(data))


def first_error(data, schema: dict):
    """The error that best explains why `data` does not fit `schema` (jsonschema's best match), or None."""
    return jsonschema().exceptions.best_match(errors(data, schema))
