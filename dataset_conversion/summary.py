"""What a conversion did: per-case results and the summary table ``nnUNetv2_dsm_convert`` prints."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from nnunetv2_dsm.labels import CLASS_NAMES

from .spec import Notes


@dataclass
class CaseResult:
    """Outcome of one case: status, annotated and present classes, the error or warnings."""
    case_id: str
    status: str                       # written | done (resumed) | failed
    test: bool = False
    annotated: List[str] = field(default_factory=list)
    present: List[str] = field(default_factory=list)
    error: str = ""
    warnings: List[str] = field(default_factory=list)


@dataclass
class Summary:
    """What a conversion did; ``table()`` is the text printed at the end."""
    source: str
    dataset_dir: Path
    results: List[CaseResult]
    notes: Notes
    dataset_json_written: bool = False

    def by_status(self, status: str, test: Optional[bool] = None) -> List[CaseResult]:
        return [r for r in self.results if r.status == status and (test is None or r.test == test)]

    @property
    def failed(self) -> List[CaseResult]:
        return self.by_status("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        train = [r for r in self.results if r.status != "failed" and not r.test]
        test = [r for r in self.results if r.status != "failed" and r.test]
        lines = [f"nnUNetv2_dsm_convert {self.source} -> {self.dataset_dir}",
                 f"  labelled cases (imagesTr): {len(train)} ({len(self.by_status('written', False))} written, "
                 f"{len(self.by_status('done', False))} already done)",
                 f"  test images (imagesTs):    {len(test)} ({len(self.by_status('written', True))} written, "
                 f"{len(self.by_status('done', True))} already done)",
                 f"  skipped: {len(self.notes.skipped)}    failed: {len(self.failed)}"]
        annotated = {n: sum(n in r.annotated for r in train) for n in CLASS_NAMES}
        present = {n: sum(n in r.present for r in train) for n in CLASS_NAMES}
        rows = [n for n in CLASS_NAMES if annotated[n] or present[n]]
        if rows:
            w = max(len(n) for n in rows)
            lines.append(f"  {'class':<{w}}  annotated  present")
            lines += [f"  {n:<{w}}  {annotated[n]:>9}  {present[n]:>7}" for n in rows]
        for what, why in self.notes.skipped:
            lines.append(f"  SKIPPED {what}: {why}")
        for r in self.results:
            lines += [f"  WARNING {r.case_id}: {w}" for w in r.warnings]
        lines += [f"  WARNING {w}" for w in self.notes.warnings]
        for r in self.failed:
            lines.append(f"  FAILED {r.case_id}: {r.error}")
        if self.failed:
            lines.append("  dataset.json " + ("written without the failed cases (--skip-failed)." if
                                             self.dataset_json_written else
                                             "NOT written: fix the files above and run the same command again "
                                             "(finished cases are not redone), or pass --skip-failed."))
        return "\n".join(lines)
