"""Split traffic: the part of the serving contract a stepwise shift needs.

A target that can split traffic between two versions (our model server, a SageMaker
endpoint) also answers:

- ``can_split(version)``: None when ``version`` can take part of the traffic now, else why
  not (a SageMaker version without a variant needs a new fleet: only an instant flip);
- ``split(version, manifest, share, *, expected, revision, ttl)``: send ``share`` percent
  (1-99) of the traffic to ``version``, the rest to ``expected`` (the version the pointer
  names, still live), and return what the serving system then reports, read back from it.
  ``revision`` is the pointer's revision (the model server refuses a split that does not
  match it); ``ttl`` how long the split may last unless renewed (the model server drops it
  then; SageMaker has no such timer, the reconciler puts a forgotten split back).

A split ends by an activation: ``activate(version)`` sends all the traffic to one version,
the restored one at 100 %, or the previous one when a gate stops the shift.

``split_of(served)`` reads a split back from any target's ``Served``, as percent of the
traffic by version (``{"1.2.0": 75, "1.1.0": 25}``); None when one version has it all. The
model server reports ``detail["split"]`` (``{"version", "share", "base", ...}``), SageMaker
``detail["shares"]`` (from the variants' current weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from blocks.serving import ServingTarget

if TYPE_CHECKING:
    from blocks.registry import Manifest
    from blocks.serving import Served


@runtime_checkable
class SplittingTarget(ServingTarget, Protocol):
    def can_split(self, version: str) -> str | None: ...

    def split(
        self,
        version: str,
        manifest: Manifest,
        share: int,
        *,
        expected: str,
        revision: int | None,
        ttl: float,
    ) -> Served: ...


def splits_traffic(target: ServingTarget | None) -> bool:
    return target is not None and isinstance(target, SplittingTarget)


def split_of(served: Served) -> dict[str, int] | None:
    split: Any = served.detail.get("split")
    if isinstance(split, dict) and split.get("share") and split.get("version"):
        base = split.get("base") or served.version
        return {str(base): 100 - int(split["share"]), str(split["version"]): int(split["share"])}
    shares: Any = served.detail.get("shares")
    if isinstance(shares, dict) and len([v for v in shares.values() if v]) > 1:
        return {str(k): int(v) for k, v in shares.items() if v}
    return None
