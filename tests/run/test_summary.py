"""RunSummary: what `run` prints after its stages (text) and its --json document (as_dict)."""

import json

from phrasefuse.run.pipeline import RunSummary, StageResult


def test_the_summary_names_the_table_and_report_of_the_run(tmp_path):
    work = tmp_path / "work"
    (work / "ablation").mkdir(parents=True)
    (work / "ablation" / "ablation.md").write_text("| row | top-1 |\n|---|---|\n| image | 80.0 |\n")
    (work / "ablation" / "ablation.json").write_text(json.dumps({"tables": [{"regime": "full"}]}))
    stages = [StageResult("extract image", "ran", "extract image: 3 embedded", {"embedded": 3}),
              StageResult("report", "skipped", "up to date", {"files": [str(work / "report.html")]})]
    summary = RunSummary.of(stages)
    assert summary.text() == f"\n| row | top-1 |\n|---|---|\n| image | 80.0 |\n\nreport: {work / 'report.html'}"
    assert summary.as_dict() == {
        "stages": [{"stage": "extract image", "status": "ran", "summary": {"embedded": 3}},
                   {"stage": "report", "status": "skipped", "summary": {"files": [str(work / "report.html")]}}],
        "work": str(work), "report": str(work / "report.html"), "ablation": {"tables": [{"regime": "full"}]}}
    assert stages[1].text() == "[skipped] report: up to date"

    # no ablation section: only where the report is; no report stage: nothing to add
    (work / "ablation" / "ablation.md").unlink()
    (work / "ablation" / "ablation.json").unlink()
    assert RunSummary.of(stages).text() == f"report: {work / 'report.html'}"
    assert RunSummary.of(stages[:1]).text() == "" and RunSummary.of(stages[:1]).as_dict()["work"] is None
