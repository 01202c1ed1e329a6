# One rule per registry stage. Outputs are content-addressed folders (tvt/stages.py): a rule
# only ever builds a folder whose key it computed, so no run deletes or overwrites another
# configuration's result. The command is the same text for every config (the code trigger
# never fires for a config edit); the key is the rule's only parameter.
# `exec` replaces the job's shell with the stage process, which then dies with Snakemake.
for _stage in STAGES.values():

    rule:
        name:
            _stage.name
        input:
            list(tvt_stages.inputs_of(_stage, STAGES)),
        output:
            stage_outputs(_stage),
        params:
            stage=_stage.name,
            key=_stage.key,
        log:
            f"logs/{_stage.name}.log",
        resources:
            **_stage.resources.snakemake(),
        threads: _stage.resources.cpus
        retries: _stage.retries
        message:
            f"{_stage.name}: {_stage.description}; resources: "
            + ", ".join(f"{k}={{resources.{k}}}" for k in _stage.resources.snakemake())
        shell:
            'exec "$TVT_PYTHON" -m tvt stage {params.stage} --config "$TVT_CONFIG_SNAPSHOT" --key {params.key} '
            "> >(tee {log}) 2>&1"
