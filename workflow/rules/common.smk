# Load and validate the config with tvt's own schema checks (one readable line on error),
# and open one MLflow parent run per pipeline invocation (stage runs nest under it).
import os
import sys

from tvt import config as tvt_config
from tvt import stages as tvt_stages

# `--configfile X` selects the config; its path (not Snakemake's merged dict) is handed
# to every stage so that Snakemake and DVC runs read exactly the same file.
CONFIG_PATH = str(workflow.overwrite_configfiles[-1]) if workflow.overwrite_configfiles else "config/config.yaml"
try:
    CFG = tvt_config.load(CONFIG_PATH)
except tvt_config.ConfigError as exc:
    sys.exit(f"config error: {exc}")

STAGES = {st.name: st for st in tvt_stages.build_stages(CFG)}


onstart:
    from tvt import tracking

    tracking.start_pipeline_run(CFG, CONFIG_PATH, "snakemake")  # exports TVT_PIPELINE_RUN_ID


onsuccess:
    if os.environ.get("TVT_PIPELINE_RUN_ID"):
        from tvt import tracking

        tracking.end_pipeline_run(CFG, os.environ["TVT_PIPELINE_RUN_ID"], ok=True)


onerror:
    if os.environ.get("TVT_PIPELINE_RUN_ID"):
        from tvt import tracking

        tracking.end_pipeline_run(CFG, os.environ["TVT_PIPELINE_RUN_ID"], ok=False)
