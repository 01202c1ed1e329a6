# What `snakemake --report report.html` shows (Snakemake's own report: https://snakemake.readthedocs.io,
# "Snakemake Reports"): the outputs of registry stages flagged here with report(), in categories.
# Stages and their outputs stay defined once, in tvt/stages.py; this file only says how the
# report presents some of them. The evaluation's `tables` folder holds everything shown:
#   html/<table>.html    the paper-shaped tables (Table 2/3/4 shapes, ablations, published
#                        numbers, claims, metric availability), written by tvt/report_assets.py
#   figures/<figure>.png comparison grids LR | methods | HR with the zoomed crop, OCR vs text size,
#                        StableSR's CFW dial (tvt/evaluate.py, tvt/reports.py)
#   curves/<stage>.svg   one training-curve figure per training stage, from its MLflow runs
_TABLE_ORDER = ("table2", "table3", "table4", "complexity", "claims", "ablation", "paper")


def _category(wildcards):
    if hasattr(wildcards, "table"):
        return "Tables"
    if hasattr(wildcards, "stage"):
        return "Training curves"
    return "Comparison grids" if wildcards.figure.startswith("compare_") else "Figures"


def _labels(wildcards):
    if hasattr(wildcards, "table"):
        return {"table": wildcards.table}
    if hasattr(wildcards, "stage"):
        return {"stage": wildcards.stage}
    return {"figure": wildcards.figure.removeprefix("compare_").replace("__", "/")}


#: stage name -> {output relative to the stage folder: report() arguments}
REPORT = {
    "evaluate": {
        "tables": dict(
            patterns=["html/{table}.html", "figures/{figure}.png", "curves/{stage}.svg"],
            category=_category,
            labels=_labels,
            caption="../report/results.rst",
        ),
    },
}


def stage_outputs(stage):
    """The rule's outputs: directories (flagged for the report where REPORT says so), metrics, plots."""
    flagged = REPORT.get(stage.name, {})
    outs = []
    for rel, path in zip(stage.outs, stage.out_paths):
        out = directory(path)
        outs.append(report(out, **flagged[rel]) if rel in flagged else out)
    return outs + list(stage.metric_paths) + list(stage.plot_paths)
