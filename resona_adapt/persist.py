"""Deprecated: the names of this module moved (see docs/map.md). Kept so that old imports still work.

- `resona_state_dict`, `load_resona_state_dict`, `base_view`, `retrofit_from_section`: `resona_adapt.state`
- `save_retrofitted`, `read_resona_section`: `resona_adapt.formats.merged`
- `attach_retrofitted`: `resona_adapt.formats.mamba_ssm`
- `load_retrofitted`: `resona_adapt.loading` (and ``resona_adapt`` itself)
"""

from __future__ import annotations

import warnings

from .formats.mamba_ssm import attach_retrofitted
from .formats.merged import read_resona_section, save_retrofitted
from .loading import load_retrofitted
from .state import SECTION_KEYS, base_view, load_resona_state_dict, resona_state_dict, retrofit_from_section

warnings.warn("resona_adapt.persist is deprecated: import from resona_adapt (or resona_adapt.state / "
              "resona_adapt.formats / resona_adapt.loading)", DeprecationWarning, stacklevel=2)

__all__ = ["SECTION_KEYS", "attach_retrofitted", "base_view", "load_resona_state_dict", "load_retrofitted",
           "read_resona_section", "resona_state_dict", "retrofit_from_section", "save_retrofitted"]
