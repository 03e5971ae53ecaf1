"""Every field of a project, once: the table that update masks, proto
conversion, storage columns and the CLI's flags are made from.

A field's name is the same everywhere: the ``Project`` attribute, the
``conveyor.v1.Project`` field and the ``projects`` column. Adding a setting
is one row here plus its migration, its proto field and its
``ProjectSettings`` attribute with validation; ``tests/control/
test_project_fields.py`` fails until all of them exist. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["text", "int", "bool", "globs", "list", "time", "id"]


@dataclass(frozen=True)
class ProjectField:
    """One field of a project.

    ``settable`` fields are the user's settings (``ProjectSettings``): given
    on create, changed by an update mask. ``flag`` is the CLI option of
    ``projects update`` (and of ``projects create``, unless ``create_flag``
    names another, without ``--`` for a positional): a bool's update flag
    takes ``on``/``off``, and ``inverted`` says the flag's "on" is the
    field's False (``--network on`` is ``network_isolated=False``); its
    create flag is a switch that turns the field from ``create_default``
    to the opposite. ``globs`` lists repeat their flag; ``list`` lists are
    comma-separated. ``create_default`` is what a create request carries
    without the flag (None: the proto's zero value), ``required`` makes
    ``projects create`` refuse to go without it, and ``create_help``
    replaces ``help`` there."""

    name: str
    kind: Kind
    settable: bool = False
    flag: str = ""
    create_flag: str = ""
    inverted: bool = False
    help: str = ""
    create_help: str = ""
    create_default: str | bool | None = None
    required: bool = False
    choices: tuple[str, ...] = ()

    @property
    def create_option(self) -> str:
        """The option of ``projects create`` (a positional without ``--``)."""
        return self.create_flag or self.flag

    @property
    def dest(self) -> str:
        """The argparse destination of ``flag``."""
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def create_dest(self) -> str:
        """The argparse destination of ``create_option``."""
        return self.create_option.removeprefix("--").replace("-", "_")


FIELDS: tuple[ProjectField, ...] = (
    ProjectField("id", "id"),
    ProjectField("account_id", "id"),
    ProjectField(
        "name",
        "text",
        True,
        "--name",
        "name",
        help="a new name",
        create_help="letters, digits, '-', '_', '.'; unique in the account",
    ),
    ProjectField(
        "repo_url", "text", True, "--repo", help="repository URL builds clone", required=True
    ),
    ProjectField(
        "production_branch",
        "text",
        True,
        "--production-branch",
        help="the branch that deploys",
        create_default="main",
    ),
    ProjectField(
        "build_command", "text", True, "--build-command", help="run by bash in every build"
    ),
    ProjectField(
        "deploy_command",
        "text",
        True,
        "--deploy-command",
        help="run after the build on the production branch",
    ),
    ProjectField(
        "preview_command",
        "text",
        True,
        "--preview-command",
        help="run after the build on other branches",
    ),
    # Secret: answered only by create and rotation, never by a read.
    ProjectField("webhook_secret", "text"),
    ProjectField(
        "run_timeout_seconds",
        "int",
        True,
        "--run-timeout",
        help="seconds a build may run",
        create_help="seconds a build may run (0: 1,200)",
    ),
    ProjectField(
        "cancel_in_progress",
        "bool",
        True,
        "--cancel-in-progress",
        help="a newer build of a branch cancels its running one",
    ),
    ProjectField(
        "build_other_branches",
        "bool",
        True,
        "--other-branches",
        "--production-only",
        help="build branches besides production",
        create_help="build the production branch only",
        create_default=True,
    ),
    ProjectField(
        "root_directory",
        "text",
        True,
        "--root-directory",
        help="where the commands run",
        create_help="where the commands run, relative to the repository",
    ),
    ProjectField("created_at", "time"),
    ProjectField("updated_at", "time"),
    ProjectField(
        "branch_include",
        "globs",
        True,
        "--branch-include",
        help="build only other branches matching GLOB",
    ),
    ProjectField(
        "branch_exclude",
        "globs",
        True,
        "--branch-exclude",
        help="never build branches matching GLOB (wins over include)",
    ),
    ProjectField(
        "watch_include",
        "globs",
        True,
        "--watch-include",
        help="build only when a changed file matches GLOB",
    ),
    ProjectField(
        "watch_exclude", "globs", True, "--watch-exclude", help="ignore changed files matching GLOB"
    ),
    ProjectField(
        "forge",
        "text",
        True,
        "--forge",
        help="where commit statuses go",
        choices=("github", "gitlab"),
    ),
    ProjectField(
        "forge_api_url", "text", True, "--forge-api-url", help="e.g. https://api.github.com"
    ),
    ProjectField(
        "forge_repo", "text", True, "--forge-repo", help="owner/repo, or a GitLab project id"
    ),
    ProjectField(
        "network_isolated",
        "bool",
        True,
        "--network",
        "--no-network",
        inverted=True,
        help="network access of builds",
        create_help="run the project's builds without network",
    ),
    ProjectField(
        "cache_disabled",
        "bool",
        True,
        "--cache",
        "--no-cache",
        inverted=True,
        help="the build cache of builds",
        create_help="build without the build cache",
    ),
    ProjectField(
        "cache_lockfiles",
        "list",
        True,
        "--cache-lockfiles",
        help="file-name globs in the root directory whose contents key the cache"
        " ('' for the defaults)",
    ),
    ProjectField(
        "cache_paths",
        "list",
        True,
        "--cache-paths",
        help="paths saved after a successful build, relative to the root directory"
        " or starting with ~/ ('' for the defaults)",
    ),
    # Only a purge changes it.
    ProjectField("cache_generation", "int"),
    ProjectField(
        "fork_secrets",
        "bool",
        True,
        "--fork-secrets",
        help="secrets and the preview step for builds of pull requests from forks",
        create_help="give builds of pull requests from forks the project's secrets and"
        " preview step",
    ),
)

BY_NAME = {f.name: f for f in FIELDS}
# The user's settings, in the table's order: the CLI's flags, in its help.
SETTINGS = tuple(f for f in FIELDS if f.settable)
# What an update mask may name.
UPDATABLE = frozenset(f.name for f in FIELDS if f.settable)
# The ``projects`` columns a project is read from, in the table's order.
COLUMNS = tuple(f.name for f in FIELDS)
