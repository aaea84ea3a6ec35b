"""Placement: where a parameter's state tensors live between steps.

``device`` keeps them beside the parameter (zero overhead). Other placements
(``paged``) register here and are chosen by the ``placement`` option.
"""

from __future__ import annotations

from typing import Any

#: placement name -> its implementation (None: on the device, no work per step)
PLACEMENTS: dict[str, Any] = {"device": None}
