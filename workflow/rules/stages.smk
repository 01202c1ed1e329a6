# One rule per registry stage. Only the stage's own config section enters the rule (as
# the hash in `params`), so Snakemake's params trigger reruns exactly the stages whose
# section changed. The command is `tvt stage <name> --config <file>`: all logic lives in
# the package.
for _stage in STAGES.values():

    rule:
        name:
            _stage.name
        input:
            list(_stage.inputs),
        output:
            [directory(o) for o in _stage.outs] + list(_stage.metrics) + list(_stage.plots),
        params:
            # evaluated now, per rule (the shell string itself is evaluated at job time,
            # when the loop variable would name the last stage)
            cmd=_stage.command(CONFIG_PATH),
            section_hash=_stage.params_hash(CFG),
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
            "{params.cmd} 2>&1 | tee {log}"
