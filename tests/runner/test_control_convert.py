"""control_client.py converts between the wire and the runner's domain: no
field of the proto is dropped on the way in, none is lost on the way out."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from conveyor.v1 import runner_service_pb2 as rs
from conveyor.v1 import types_pb2 as pb
from runner import control_client
from runner.domain import (
    Ack,
    Assignment,
    BuildStatus,
    Cancel,
    EnvVar,
    Heartbeat,
    Hello,
    Registered,
    StatusReport,
    StepStatus,
    StepUpdate,
)

AT = datetime(2025, 1, 31, 12, 0, 0, 123000, tzinfo=UTC)


def _filled(message: Message) -> Message:
    """``message`` with every scalar and repeated-scalar field set to a value
    unlike its default and unlike every other field's."""
    for number, field in enumerate(message.DESCRIPTOR.fields, start=1):
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_STRING:
            value: object = f"{field.name}-{number}"
        elif field.type == FieldDescriptor.TYPE_BOOL:
            value = True
        elif field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
            value = 1000 + number
        else:
            continue  # messages are filled by the caller
        if repeated:
            getattr(message, field.name).extend([value, value])
        else:
            setattr(message, field.name, value)
    return message


def test_an_assignment_arrives_with_every_field() -> None:
    wire = _filled(rs.Assignment())
    assert isinstance(wire, rs.Assignment)
    wire.env.add(name="A", value="1", secret=False)
    wire.env.add(name="TOKEN", value="s3cret", secret=True)
    message = control_client.control_message_from_pb(rs.ConnectResponse(assignment=wire))
    assert isinstance(message, Assignment)
    for field in rs.Assignment.DESCRIPTOR.fields:
        if field.name == "env":
            continue
        expected = getattr(wire, field.name)
        if field.is_repeated:
            expected = tuple(expected)
        assert getattr(message, field.name) == expected, field.name
    assert message.env == (EnvVar("A", "1", secret=False), EnvVar("TOKEN", "s3cret", secret=True))


def test_registered_and_cancel_arrive_and_an_unknown_kind_is_skipped() -> None:
    registered = rs.ConnectResponse(registered=rs.Registered(runner_id="r1", heartbeat_seconds=7))
    cancel = rs.ConnectResponse(
        cancel=rs.CancelAssignment(build_id="b1", reason="canceled by alice", grace_seconds=3)
    )
    assert control_client.control_message_from_pb(registered) == Registered("r1", 7)
    assert control_client.control_message_from_pb(cancel) == Cancel("b1", "canceled by alice", 3)
    assert control_client.control_message_from_pb(rs.ConnectResponse()) is None


def test_the_hello_leaves_with_every_field() -> None:
    hello = Hello(
        runner_id="r1", name="host-a", capacity=4, labels=("linux", "x86"), launcher="local",
        sandbox="bubblewrap", version="v1.2.0", running_build_ids=("b1", "b2"),
    )  # fmt: skip
    wire = control_client.runner_message_to_pb(hello)
    assert wire.WhichOneof("kind") == "hello"
    for field in rs.RunnerHello.DESCRIPTOR.fields:
        value = getattr(wire.hello, field.name)
        if field.is_repeated:
            value = tuple(value)
        assert value == getattr(hello, field.name), field.name


def test_heartbeats_and_acks_leave_as_they_are() -> None:
    beat = control_client.runner_message_to_pb(Heartbeat(busy=2, draining=True))
    assert beat == rs.ConnectRequest(heartbeat=rs.RunnerHeartbeat(busy=2, draining=True))
    ack = control_client.runner_message_to_pb(Ack("b1", accepted=False, reason="runner busy"))
    assert ack == rs.ConnectRequest(
        ack=rs.AssignmentAck(build_id="b1", accepted=False, reason="runner busy")
    )


def test_a_report_keeps_a_zero_exit_code_apart_from_none() -> None:
    report = StatusReport(
        build_id="b1",
        at=AT,
        steps=(
            StepUpdate(1, "build", StepStatus.RUNNING, AT),
            StepUpdate(1, "build", StepStatus.SUCCEEDED, AT, exit_code=0),
            StepUpdate(2, "deploy", StepStatus.FAILED, AT, exit_code=3),
        ),
        warnings=("build ran WITHOUT a sandbox",),
    )
    wire = control_client.report_to_pb(report)
    assert wire.build_id == "b1"
    assert wire.status == pb.BUILD_STATUS_UNSPECIFIED  # only steps changed
    assert wire.at.ToDatetime(tzinfo=UTC) == AT
    assert list(wire.warnings) == ["build ran WITHOUT a sandbox"]
    assert [(s.index, s.name, s.status, s.has_exit_code, s.exit_code) for s in wire.steps] == [
        (1, "build", pb.STEP_STATUS_RUNNING, False, 0),
        (1, "build", pb.STEP_STATUS_SUCCEEDED, True, 0),
        (2, "deploy", pb.STEP_STATUS_FAILED, True, 3),
    ]
    assert all(s.at.ToDatetime(tzinfo=UTC) == AT for s in wire.steps)


def test_a_final_report_carries_its_status_and_reason() -> None:
    report = StatusReport("b1", AT, BuildStatus.TIMED_OUT, reason="run deadline of 60 s")
    wire = control_client.report_to_pb(report)
    assert (wire.status, wire.reason) == (pb.BUILD_STATUS_TIMED_OUT, "run deadline of 60 s")
