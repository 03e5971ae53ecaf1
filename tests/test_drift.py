"""Drift between the domain and the protos: a value added on one side and
forgotten on the other fails here, not in a conversion at run time."""

from __future__ import annotations

import enum

import pytest

from control.api import convert
from control.domain.build import BuildStatus, StepStatus
from conveyor.v1 import types_pb2 as pb
from runner import control_client
from runner import domain as runner_domain

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


# The runner reports a subset of each proto enum; the rest is the control
# plane's word. A proto value added later must land in one list or the other.
RUNNER_PAIRS = [
    (
        runner_domain.BuildStatus, pb.BuildStatus, "BUILD_STATUS_",
        control_client.BUILD_STATUS_TO_PB, {"unspecified", "queued", "superseded"},
    ),
    (
        runner_domain.StepStatus, pb.StepStatus, "STEP_STATUS_",
        control_client.STEP_STATUS_TO_PB, {"unspecified", "pending", "skipped", "canceled"},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("domain", "proto", "prefix", "to_pb", "not_ours"), RUNNER_PAIRS)
def test_every_runner_value_has_its_proto_value_and_back(
    domain: type[enum.StrEnum],
    proto: object,
    prefix: str,
    to_pb: dict[enum.StrEnum, int],
    not_ours: set[str],
) -> None:
    values = proto.DESCRIPTOR.values_by_name  # type: ignore[attr-defined]
    wire = {name.removeprefix(prefix).lower() for name in values}
    ours = {member.value for member in domain}
    assert ours | not_ours == wire
    assert not ours & not_ours
    assert {m: values[prefix + m.value.upper()].number for m in domain} == to_pb
    # And back: each proto number names exactly one runner value.
    by_number = proto.DESCRIPTOR.values_by_number  # type: ignore[attr-defined]
    back = {
        number: domain(by_number[number].name.removeprefix(prefix).lower())
        for number in to_pb.values()
    }
    assert back == {number: member for member, number in to_pb.items()}
