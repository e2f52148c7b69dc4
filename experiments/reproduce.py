"""The main job: run every registered reproduction at one scale and write DIR/REPORT.md linking their reports.

    python -m experiments.reproduce --scale=demo|tiny|small --workdir=DIR [--only=NAME]

`demo` exercises every registered paper end to end in minutes on 2 CPU cores; `tiny` and `small` are the
configurations whose numbers the reports discuss. Rerunning resumes: finished training runs are skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from experiments.cli import run
from experiments.registry import SCALES, load_reproductions
from lm_core.errors import UserError

_SCALE = flags.DEFINE_string("scale", "demo", f"One of {', '.join(SCALES)}.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where reports, runs and plots go.", required=True)
_ONLY = flags.DEFINE_list("only", [], "Run only these reproductions (by NAME); default: all.")


def main(argv: list[str]) -> None:
    del argv
    if _SCALE.value not in SCALES:
        raise UserError(f"--scale={_SCALE.value!r} is unknown; valid: {', '.join(SCALES)}")
    workdir = Path(_WORKDIR.value).absolute()
    reproductions = load_reproductions()
    names = [r.NAME for r in reproductions]
    unknown = sorted(set(_ONLY.value) - set(names))
    if unknown:
        raise UserError(f"--only names unknown reproduction(s) {unknown}; valid: {', '.join(names)}")
    selected = [r for r in reproductions if not _ONLY.value or r.NAME in _ONLY.value]
    workdir.mkdir(parents=True, exist_ok=True)
    sections = []
    for index, reproduction in enumerate(selected, start=1):
        print(f"== [{index}/{len(selected)}] {reproduction.TITLE} (scale {_SCALE.value})", flush=True)
        started = time.monotonic()
        section = reproduction.run(_SCALE.value, workdir / reproduction.NAME)
        sections.append((section, time.monotonic() - started))
    lines = [f"# Reproductions at scale `{_SCALE.value}`", ""]
    for section, seconds in sections:
        lines += [f"## {section.title}", "", f"Report: [{section.report.relative_to(workdir)}]"
                  f"({section.report.relative_to(workdir)}) — ran in {seconds / 60:.1f} min", "", section.summary, ""]
    (workdir / "REPORT.md").write_text("\n".join(lines))
    print(f"wrote {workdir / 'REPORT.md'}")


if __name__ == "__main__":
    run(main)
