"""The project field table (``control.domain.project_fields``) against what
it stands for: the proto message, the domain types, the migrated
``projects`` table and the CLI's flags. A field added in one place and not
the others fails here."""

from __future__ import annotations

import argparse
from dataclasses import fields

import psycopg

from control.domain import project_fields
from control.domain.project import Project, ProjectSettings
from control.storage.migrate import migrate
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from conveyor_cli.main import _parser

NAMES = [f.name for f in project_fields.FIELDS]
SETTABLE = {f.name for f in project_fields.FIELDS if f.settable}


def test_every_proto_field_is_in_the_table_and_back() -> None:
    assert sorted(pb.Project.DESCRIPTOR.fields_by_name) == sorted(NAMES)
    assert len(set(NAMES)) == len(NAMES)
    # A create request carries every setting (convert.settings_from_pb).
    assert set(cs.CreateProjectRequest.DESCRIPTOR.fields_by_name) >= SETTABLE


def test_the_table_is_the_domain_types() -> None:
    assert [f.name for f in fields(Project)] == NAMES
    assert {f.name for f in fields(ProjectSettings)} == SETTABLE


async def test_every_field_has_a_column_in_the_migrations(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await migrate(conn)
        cur = await conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'projects'"
        )
        columns = {r[0] for r in await cur.fetchall()}
    assert set(NAMES) <= columns


def _options(parser: argparse.ArgumentParser, *path: str) -> dict[str, argparse.Action]:
    """The arguments of ``conveyor PATH...``: option strings, and the
    destinations of positionals."""
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    positionals = {a.dest: a for a in parser._actions if not a.option_strings}
    return positionals | dict(parser._option_string_actions)


def test_every_setting_has_its_cli_flags() -> None:
    update = _options(_parser(), "projects", "update")
    create = _options(_parser(), "projects", "create")
    for f in project_fields.FIELDS:
        if not f.settable:
            assert not f.flag, f.name
            continue
        assert f.flag in update, f.name
        assert update[f.flag].dest == f.dest
        assert update[f.flag].help == f.help
        if f.kind == "bool":
            assert update[f.flag].choices == ["on", "off"], f.name
        assert f.create_option in create, f.name
        assert create[f.create_option].dest == f.create_dest
        assert create[f.create_option].help == (f.create_help or f.help)
        if f.create_option.startswith("--"):  # a positional is always required
            assert create[f.create_option].required == f.required, f.name


def test_the_cli_has_no_project_flag_outside_the_table() -> None:
    """``project`` names the project to change; ``--json`` the output."""
    update = {a.dest for a in _options(_parser(), "projects", "update").values()}
    create = {a.dest for a in _options(_parser(), "projects", "create").values()}
    settings = project_fields.SETTINGS
    assert update - {f.dest for f in settings} == {"help", "json", "project"}
    assert create - {f.create_dest for f in settings} == {"help", "json"}
