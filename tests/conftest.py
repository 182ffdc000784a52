"""Hypothesis profiles. CI must give the same verdict on every run of the same commit, so its
property tests are derandomized and keep no example database (a failure found once would be
replayed forever from .hypothesis/); a developer's run explores new examples every time.
The profile is "ci" where the CI variable is set (as .ci/run and most CI services set it), and
HYPOTHESIS_PROFILE picks one by name."""
from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
