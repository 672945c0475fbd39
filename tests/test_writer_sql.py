"""The writer's statement spells "status = 'sending'" as a NOT IN list (to keep the planner off
the in-flight index); the list must name every other status, or it would mean something else."""

import re

from harness import STATUSES
from sendd.actors.writer import WRITE_OUTCOMES


def test_the_sending_check_excludes_exactly_the_other_statuses() -> None:
    listed = re.search(r"m\.status NOT IN \(([^)]*)\)", WRITE_OUTCOMES)
    assert listed is not None
    excluded = set(re.findall(r"'(\w+)'", listed.group(1)))
    assert excluded == set(STATUSES) - {"sending"}
