"""torchmetrics without the optional backends it loads for metrics archflow never computes.

Lightning imports torchmetrics (for its `Metric` type), and torchmetrics, as it loads, imports every
optional backend it finds installed (Lightning-AI/torchmetrics#2242): `scipy.signal` (MLflow installs
scipy) and `transformers` with what that pulls in (scikit-learn, torch's distributed tensors; the `hf`
and `dev` extras install it). That was ~0.5 s and ~1 s of every training stage's start-up, for audio and
text metrics. archflow logs plain tensors and computes no torchmetrics metric, so components/lit.py
calls `import_torchmetrics` before it imports Lightning: torchmetrics loads once, with lightning_utilities
(which answers its "is X installed?" checks) reporting those packages missing; the checks are restored
right after, for everything else in the process (a Hugging Face import, lm-eval). torchmetrics then
behaves as where they are not installed: a metric that needs them says so if called.

    python -X importtime -m tasks.pretrain --help 2>&1 | grep -E "scipy.signal|transformers$"   # nothing
"""
from __future__ import annotations

import sys

UNUSED = ("scipy", "transformers")


def import_torchmetrics() -> None:
    """Import torchmetrics with UNUSED reported missing while it loads (a no-op if it is imported already)."""
    from lightning_utilities.core import imports
    check_requirement = getattr(imports.RequirementCache, "_check_requirement", None)
    if "torchmetrics" in sys.modules or check_requirement is None:   # loaded already, or a lightning_utilities
        return                                                       # this was not written against
    from packaging.requirements import Requirement
    package_available = imports.package_available

    def check_unless_unused(cache) -> None:   # RequirementCache("transformers>=4.4.0") and the like
        if Requirement(cache.requirement).name in UNUSED:
            cache.available, cache.message = False, f"{cache.requirement!r} not loaded (components/lean_torchmetrics.py)"
        else:
            check_requirement(cache)

    imports.RequirementCache._check_requirement = check_unless_unused
    imports.package_available = lambda name: name not in UNUSED and package_available(name)
    try:
        import torchmetrics  # noqa: F401
    finally:
        imports.RequirementCache._check_requirement, imports.package_available = check_requirement, package_available
