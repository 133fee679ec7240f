"""The orchestration layer: what turns a recipe into jobs and the jobs into a report.

    cli        `python -m harness.reproduce`: parse, compose (harness.plan.config), plan (harness.plan.graph),
    preflight, run,
               report (harness.report.markdown); sweeps (-m), `all`, --dry-run, --rehearse
    preflight  every input checked before anything is submitted: data, teacher checkpoints, the Slurm cluster
    launch     runs a plan's stages: in process (debug), as submitit local jobs or Slurm job arrays; chains a row's
               stages into one job, re-attaches to running jobs, requeues on preemption
    dispatch   which ready job starts first when there are fewer slots than ready jobs
    sbatch     plain sbatch scripts instead of a long-lived driver
    sweep      -m: one results root per point, stages shared between points, the combined report
    rehearse   --rehearse: every stage for a few steps on a few images, and the REHEARSAL report

Below it: harness.plan.graph and harness.plan.config (torch-free), the ML core the jobs run (harness.core.stages and
what it
imports), and harness.core.rundir, the one owner of a stage directory. Nothing below imports this package.
"""
