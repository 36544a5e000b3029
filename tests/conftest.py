"""Shared test configuration."""

import os

from hypothesis import settings

# Hypothesis profiles. "ci" (the default when CI is set) is derandomized, so a CI run is
# reproducible; "dev" draws new examples each run, so local runs keep exploring. Neither has a
# deadline: timings on 2 shared cores are too noisy for one. HYPOTHESIS_PROFILE picks one.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=40, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
