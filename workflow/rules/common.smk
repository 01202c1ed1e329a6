# The config and the stage registry, for every rule (tvt/stages.py is the single source).
#
# The config is `--configfile FILE` (default config/config.yaml) with `--config key=value`
# overrides merged in; nested values reach into sections (`--config 'isr={tvt: {lr: 1e-4}}'`
# changes one value; Snakemake itself refuses dotted keys such as `isr.tvt.lr=...`).
# It is validated with tvt's own schema checks (one readable line on error) and frozen into a
# content-addressed snapshot, resources/configs/<hash>.yaml, which every stage reads. Nothing
# of the path the user typed reaches a rule: `config/ci.yaml`, its absolute path and
# `tvt pipeline` are the same run, and every output is keyed by what produced it.
import os
import sys

from tvt import config as tvt_config
from tvt import stages as tvt_stages

CONFIG_PATH = str(workflow.overwrite_configfiles[-1]) if workflow.overwrite_configfiles else "config/config.yaml"
try:
    CFG = tvt_config.load_with_overrides(CONFIG_PATH, dict(workflow.config_settings.config))
except tvt_config.ConfigError as exc:
    sys.exit(f"config error: {exc}")
# The report's description (workflow/report/workflow.rst) names the mode through Snakemake's own
# `config`, which holds the file as written: an `extends:` config states no mode of its own.
config["mode"] = CFG["mode"]
# For the rules' shell, as environment variables: the same command text for every config (a
# config edit never fires Snakemake's code or params trigger; the key carries what changed).
#: the config snapshot every stage reads
os.environ["TVT_CONFIG_SNAPSHOT"] = tvt_config.snapshot(CFG, "resources/configs")
#: the interpreter that runs Snakemake runs the stages: the project's, activated or not
os.environ["TVT_PYTHON"] = sys.executable


envvars:
    "TVT_PYTHON",
    "TVT_CONFIG_SNAPSHOT",


STAGES = {st.name: st for st in tvt_stages.build_stages(CFG)}

# Snakemake runs no hook when there is nothing to do: a config whose outputs all exist becomes
# the current one here (otherwise in onsuccess), so A -> B -> A points results/latest back at A.
if not workflow.dryrun and all(st.is_built() for st in STAGES.values()):
    tvt_stages.update_current_links(CFG)


onstart:
    from tvt import tracking

    # refuse before the first job, not at the first LPIPS stage minutes or hours in
    _to_run = {job.rule.name for job in workflow.dag.needrun_jobs()}
    _unready = tvt_stages.missing_perceptual_weights(CFG, [st for st in STAGES.values() if st.name in _to_run])
    if _unready:
        raise SystemExit(f"preflight: {_unready}")
    tracking.start_pipeline_run(CFG, CONFIG_PATH, "snakemake")  # exports TVT_PIPELINE_RUN_ID


onsuccess:
    from tvt import tracking

    tvt_stages.update_current_links(CFG)
    tracking.end_current_pipeline_run(CFG, ok=True)


onerror:
    from tvt import tracking

    tracking.end_current_pipeline_run(CFG, ok=False)
