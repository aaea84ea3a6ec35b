"""Placement: where a parameter's state tensors live between steps.

``device`` keeps them beside the parameter (zero overhead). Other placements
(``paged``) register here and are chosen by the ``placement`` option.
"""

from __future__ import annotations

from typing import Any

from .paged import PagedPlacement

#: placement name -> its implementation (None: on the device, no work per step)
PLACEMENTS: dict[str, Any] = {"device": None, "paged": PagedPlacement}


def build_placement(name: str, **options: Any) -> Any:
    """The placement object for ``name`` with its options (``paged_budget``, ``paged_dir``).

    An option that the placement does not take is an error, never ignored.
    """
    factory = PLACEMENTS[name]
    given = {key: value for key, value in options.items() if value is not None}
    if factory is None:
        if given:
            key, value = next(iter(given.items()))
            raise ValueError(
                f"{key}={value!r} only applies to placement='paged' (got placement={name!r}); "
                "use a paged_ optimizer name or placement='paged'"
            )
        return None
    return factory(**options)
