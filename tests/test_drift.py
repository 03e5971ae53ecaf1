"""Drift between the domain and the protos: a value added on one side and
forgotten on the other fails here, not in a conversion at run time."""

from __future__ import annotations

import enum

import pytest

from control.api import convert
from control.domain.build import BuildStatus, StepStatus
from conveyor.v1 import types_pb2 as pb

PAIRS = [
    (BuildStatus, pb.BuildStatus, "BUILD_STATUS_", convert.BUILD_STATUS_TO_PB),
    (StepStatus, pb.StepStatus, "STEP_STATUS_", convert.STEP_STATUS_TO_PB),
]


@pytest.mark.parametrize(("domain", "proto", "prefix", "to_pb"), PAIRS)
def test_every_domain_value_has_its_proto_value_and_back(
    domain: type[enum.StrEnum], proto: object, prefix: str, to_pb: dict[enum.StrEnum, int]
) -> None:
    values = proto.DESCRIPTOR.values_by_name  # type: ignore[attr-defined]
    wire = {name.removeprefix(prefix).lower() for name in values} - {"unspecified"}
    assert {member.value for member in domain} == wire
    # The conversion table pairs each member with the proto value of its name.
    assert {m: values[prefix + m.value.upper()].number for m in domain} == to_pb
