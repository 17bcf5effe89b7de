"""Who hears about an incident, how often, and who is paged when nobody answers.

Severity P0 (complete outage or data loss) to P3 (minor); Sev1-Sev4 are accepted as synonyms
(Sev1 = P0). Each severity names the notification blocks told at the start, on every update and at
resolution, how often updates go out, and an escalation ladder: when a paused run has had no accepted
answer for a tier's ``after_minutes``, that tier is notified. Drills notify ``drill_channels`` only.
"""

from __future__ import annotations

import re

from prefect.blocks.core import Block
from pydantic import BaseModel, Field, field_validator

from blocks.errors import InvalidInput

SEVERITIES = ("P0", "P1", "P2", "P3")
_SYNONYMS = {"SEV1": "P0", "SEV2": "P1", "SEV3": "P2", "SEV4": "P3"}
CHANNEL = re.compile(r"[a-z0-9][a-z0-9-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def normalize_severity(value: str, name: str = "severity") -> str:
    """``P0``-``P3`` for a severity given as P0-P3 or Sev1-Sev4 (any case); refuses anything else."""
    text = str(value).strip().upper().replace("-", "").replace(" ", "")
    if text in SEVERITIES:
        return text
    if text in _SYNONYMS:
        return _SYNONYMS[text]
    raise InvalidInput(f"{name}={value!r} is not a severity: expected P0, P1, P2 or P3 (or Sev1-Sev4, Sev1 = P0)")


def _channels(values: list[str]) -> list[str]:
    for v in values:
        if not CHANNEL.fullmatch(v):
            raise ValueError(f"channel {v!r} is not '<block-type-slug>/<block-name>', e.g. 'slack-webhook/oncall'")
    return values


class Tier(BaseModel):
    """One rung of the escalation ladder."""

    name: str = Field(description="Who this tier is, e.g. 'incident commander'.", min_length=1)
    after_minutes: float = Field(ge=0, le=7 * 24 * 60,
                                 description="Notify this tier when a paused run has had no accepted answer this long.")
    channels: list[str] = Field(min_length=1, description="Notification blocks, '<block-type-slug>/<block-name>'.")

    _check = field_validator("channels")(classmethod(lambda cls, v: _channels(v)))


class SeverityRoute(BaseModel):
    """What one severity means for communications."""

    response_minutes: float = Field(gt=0, le=7 * 24 * 60, description="Response time the plans promise.")
    update_every_minutes: float = Field(gt=0, le=7 * 24 * 60, description="Cadence of status updates during a run.")
    channels: list[str] = Field(min_length=1, description="Told at the start, on updates and at resolution.")
    ladder: list[Tier] = Field(default_factory=list, description="Escalation tiers, in order of after_minutes.")

    _check = field_validator("channels")(classmethod(lambda cls, v: _channels(v)))

    @field_validator("ladder")
    @classmethod
    def _ordered(cls, ladder: list[Tier]) -> list[Tier]:
        times = [t.after_minutes for t in ladder]
        if times != sorted(times):
            raise ValueError(f"escalation tiers must be in order of after_minutes, got {times}")
        return ladder


def _ladder(*tiers: tuple[str, float, str]) -> list[Tier]:
    return [Tier(name=n, after_minutes=m, channels=[c]) for n, m, c in tiers]


def default_routes() -> dict[str, SeverityRoute]:
    """The continuity plans' matrix: response times and escalation levels by severity, updates on a cadence."""
    oncall = ("on-call engineer", 0, "custom-webhook/dr-oncall")
    return {
        "P0": SeverityRoute(response_minutes=5, update_every_minutes=15, channels=["custom-webhook/dr-incidents"],
                            ladder=_ladder(oncall, ("incident commander", 5, "custom-webhook/dr-incident-commander"),
                                           ("engineering management", 15, "custom-webhook/dr-engineering-management"),
                                           ("executive team", 30, "custom-webhook/dr-executives"))),
        "P1": SeverityRoute(response_minutes=15, update_every_minutes=30, channels=["custom-webhook/dr-incidents"],
                            ladder=_ladder(oncall, ("incident commander", 15, "custom-webhook/dr-incident-commander"),
                                           ("engineering management", 30, "custom-webhook/dr-engineering-management"))),
        "P2": SeverityRoute(response_minutes=30, update_every_minutes=120, channels=["custom-webhook/dr-incidents"],
                            ladder=_ladder(oncall, ("team leads", 30, "custom-webhook/dr-team-leads"))),
        "P3": SeverityRoute(response_minutes=60, update_every_minutes=1440, channels=["custom-webhook/dr-incidents"],
                            ladder=_ladder(oncall)),
    }


class IncidentRouting(Block):
    """Severity -> notification channels, update cadence and escalation ladder; drills to their own channel."""

    _block_type_name = "DR Incident Routing"

    routes: dict[str, SeverityRoute] = Field(default_factory=default_routes,
                                             description="One route per severity P0-P3.")
    drill_channels: list[str] = Field(default_factory=lambda: ["custom-webhook/dr-drills"],
                                      description="Drills notify these only, never a production channel.")
    status_page_block: str | None = Field(default=None, description="Name of the StatusPage block, if any.")

    @field_validator("routes")
    @classmethod
    def _every_severity(cls, routes: dict[str, SeverityRoute]) -> dict[str, SeverityRoute]:
        normalized = {normalize_severity(k, "routes key"): v for k, v in routes.items()}
        missing = [s for s in SEVERITIES if s not in normalized]
        if missing:
            raise ValueError(f"routes lack severities {missing}: every one of P0-P3 needs a route")
        return normalized

    _check = field_validator("drill_channels")(classmethod(lambda cls, v: _channels(v)))

    def route(self, severity: str) -> SeverityRoute:
        return self.routes[normalize_severity(severity)]

    def channels(self, severity: str, drill: bool) -> list[str]:
        """Who is told about a run: the drill channels for a drill, the severity's channels otherwise."""
        return list(self.drill_channels) if drill else list(self.route(severity).channels)

    def ladder(self, severity: str, drill: bool) -> list[Tier]:
        """The escalation ladder; a drill's every tier goes to the drill channels."""
        tiers = self.route(severity).ladder
        if drill:
            return [Tier(name=t.name, after_minutes=t.after_minutes, channels=list(self.drill_channels)) for t in tiers]
        return list(tiers)
