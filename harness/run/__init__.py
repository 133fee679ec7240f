"""The orchestration layer: what turns a recipe into jobs and the jobs into a report.

    cli         `python -m harness.reproduce`: parse, compose (harness.plan.config), plan (harness.plan.graph),
                preflight, run, report (harness.report.markdown); sweeps (-m), `all`, --dry-run, --rehearse
    preflight   every input checked before anything is submitted: data, teacher checkpoints, the Slurm cluster
    launch      the driver: submits the ready stages, waits, settles each job that ended (done, failed, blocked,
                or resubmitted when its job died before its stage wrote a result or an error)
    chains      which stages one job runs (a row's stages chained) and which ready job starts first
    stage_job   what runs inside a job: the chain of stages, requeued on preemption
    executors   in-process (debug), submitit local and Slurm executors; the code snapshot; sacct workarounds
    elsewhere   a stage someone else is running (its lock holder or a live local chain)
    progress    the console lines, the ETA, the results table
    sbatch      plain sbatch scripts instead of a long-lived driver
    sweep       -m: one results root per point, stages shared between points, the combined report
    rehearse    --rehearse: every stage for a few steps on a few images, and the REHEARSAL report
    acceptance  the one-GPU acceptance check

Below it: harness.report, harness.bench, harness.plan and the ML core the jobs run (harness.core.stages and what it
imports), with harness.core.rundir, the one owner of a stage directory. Nothing below imports this package.
"""
