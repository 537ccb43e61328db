"""What every spec section shares: the strict pydantic base and one parity tolerance."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Frozen, rejects unknown keys, validates defaults: the base of every spec section."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class Tolerance(Strict):
    """Acceptance thresholds for one parity comparison. `reason` says why these numbers.

    `max_abs_scaled` bounds max |actual - reference| / max |reference|: scale-free, so one bound holds
    for checkpoints whose activations differ in magnitude (an absolute bound does not carry across).
    """

    max_abs: float | None = Field(None, ge=0, description="bound on max |actual - reference|")
    max_abs_scaled: float | None = Field(
        None, ge=0, description="bound on max |actual - reference| / max |reference|"
    )
    max_rel: float | None = Field(None, ge=0, description="with max_abs: elements must exceed both to fail")
    min_cosine: float | None = Field(None, ge=-1, le=1)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    min_routing_agreement: float | None = Field(None, ge=0, le=1)
    reason: str = Field(min_length=1)

    @model_validator(mode="after")
    def _bounded(self) -> Tolerance:
        if self.max_abs is None and self.max_abs_scaled is None:
            raise ValueError("give max_abs or max_abs_scaled (a tolerance must bound the error)")
        if self.max_rel is not None and self.max_abs is None:
            raise ValueError("max_rel needs max_abs (an element fails only when it exceeds both)")
        return self
