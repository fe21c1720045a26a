"""LTP's settings: the ``ltp:`` section of a job's configuration.

They live beside the transport that reads them (the job configuration includes this
section, and the transport never imports the job configuration).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LtpConfig(BaseModel):
    """``--transport ltp``: the loss-tolerant UDP transport for pushes (stalwart.transport.ltp).
    The server's settings rule; clients learn them in the handshake."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mtu: int = Field(1500, ge=576, le=65535, description="IP MTU of the path; one packet fills one frame")
    min_fraction: float = Field(0.9, gt=0, le=1, description="a round never closes with less of it received "
                                                            "(the lost-fraction ceiling is 1 - this)")
    slack: float = Field(2.0, ge=1, le=100, description="early close deadline: this many recent round spans")
    fill: Literal["rescale", "zero", "previous"] = Field(
        "rescale", description="what fills lost ranges: zeros with rescale, zeros, the previous round's values")
    hadamard: bool = Field(False, description="randomized Hadamard rotation before sending (spreads loss)")
    hadamard_block: int = Field(4096, ge=2, le=1 << 22, description="rotation block, a power of two")
    rate_mbit: float | None = Field(None, gt=0, description="initial pacing rate; None: learn it from round 1")
    drop: float = Field(0.0, ge=0, lt=1, description="receiver drops this fraction of packets on purpose")
    drop_seed: int = 0
    round_timeout_s: float = Field(30.0, gt=0, description="a round with no progress this long breaks the connection")

    @model_validator(mode="after")
    def _consistent(self) -> "LtpConfig":
        if self.hadamard_block & (self.hadamard_block - 1):
            raise ValueError(f"hadamard_block {self.hadamard_block} is not a power of two")
        if self.hadamard and self.fill == "previous":
            raise ValueError("fill 'previous' cannot be combined with hadamard (the previous round was rotated "
                             "with other signs); use rescale or zero")
        return self
