"""Which pushes build: the one pure decision, with the reason a user sees
when a push does not build. No I/O."""

from __future__ import annotations

from control.domain.project import Project, matches_any
from control.webhooks.push import PushEvent

# A payload that lists no files, 3,000 files or more, or 20 commits or more
# (GitLab lists only the newest 20) does not say reliably what changed: such
# a push always builds, as on the platform Conveyor follows.
ALWAYS_BUILD_FILES = 3000
ALWAYS_BUILD_COMMITS = 20
SKIP_MARKERS = ("[skip ci]", "[ci skip]")

TAG_PUSH = "skipped: tag push"
TAG_DELETED = "skipped: tag deleted"
BRANCH_DELETED = "skipped: branch deleted"
OTHER_BRANCHES_OFF = "skipped: builds of branches other than the production branch are off"
BRANCH_EXCLUDED = "skipped: branch excluded"
BRANCH_NOT_INCLUDED = "skipped: branch not included"
SKIP_CI = "skipped: [skip ci] in the commit message"
NO_WATCHED_PATH = "skipped: no watched path changed"

# Short, bounded metric labels for each reason.
REASON_LABELS = {
    TAG_PUSH: "tag_push",
    TAG_DELETED: "tag_deleted",
    BRANCH_DELETED: "branch_deleted",
    OTHER_BRANCHES_OFF: "other_branches_off",
    BRANCH_EXCLUDED: "branch_excluded",
    BRANCH_NOT_INCLUDED: "branch_not_included",
    SKIP_CI: "skip_ci",
    NO_WATCHED_PATH: "no_watched_path",
}


def skip_reason(project: Project, push: PushEvent) -> str | None:
    """None when ``push`` builds, else the reason it does not (one of the
    constants above, sometimes followed by a detail in parentheses).

    In order: tag pushes, tag deletions and branch deletions never build; the production branch
    always passes the branch rules; another branch needs builds of other
    branches on, must not match ``branch_exclude`` (an exclude wins) and, when
    ``branch_include`` is set, must match it; then ``[skip ci]`` or ``[ci
    skip]`` in the head commit's message skips; then the watch paths.
    """
    if push.is_tag:
        return TAG_DELETED if push.deletes_branch else TAG_PUSH
    if push.deletes_branch:
        return BRANCH_DELETED
    branch = push.branch or ""
    if branch != project.production_branch:
        if not project.build_other_branches:
            return OTHER_BRANCHES_OFF
        excluded = matches_any(project.branch_exclude, branch)
        if excluded is not None:
            return f"{BRANCH_EXCLUDED} (matches {excluded!r})"
        if project.branch_include and matches_any(project.branch_include, branch) is None:
            return BRANCH_NOT_INCLUDED
    message = push.head_message.lower()
    if any(marker in message for marker in SKIP_MARKERS):
        return SKIP_CI
    if not touches_watched_path(project, push):
        return NO_WATCHED_PATH
    return None


def touches_watched_path(project: Project, push: PushEvent) -> bool:
    """True when a file the push changed is watched: it matches
    ``watch_include`` (or that list is empty) and no ``watch_exclude``.
    Without watch paths, or when the payload lists no files, 3,000 files or
    more, or 20 commits or more, every push counts as touching one."""
    if not project.watch_include and not project.watch_exclude:
        return True
    files = push.changed_files
    if not files or len(files) >= ALWAYS_BUILD_FILES or push.commit_count >= ALWAYS_BUILD_COMMITS:
        return True
    for path in files:
        if project.watch_include and matches_any(project.watch_include, path) is None:
            continue
        if matches_any(project.watch_exclude, path) is None:
            return True
    return False


def reason_label(reason: str) -> str:
    """The metric label of a reason from ``skip_reason``."""
    return REASON_LABELS.get(reason.split(" (", 1)[0], "other")
