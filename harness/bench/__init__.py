"""`python -m harness.bench` -- the measured cost of every step the harness runs (usage: harness.bench.cli).

One concept per module; importing the package imports none of them, so `harness.bench.spec` and
`harness.bench.results` (what harness.bench.estimate reads for --dry-run) stay free of torch:

    spec.py      StepSpec (what a step is, the key estimates map stages to) and a profile's steps and input pipelines
    steps.py     Pool and build_step: each step's model, objective and optimizer from harness.core.build, as the stages
    flops.py     FLOP counting: on the step's device, and on the meta device for shapes never benchmarked
    measure.py   interleaved timing (Variant, measure), the matmul peak, op-category breakdown, paired ratios
    data.py      the input-pipeline benchmark
    run.py       run / run_shape: a benchmark run and its result dict
    results.py   the files: directory, schema, device keys, loading, the issue's targets and the Markdown summary
    cli.py       the command line (`python -m harness.bench`, __main__.py)
    tblog.py     the TensorBoard writer's cost per step (`--tensorboard`), and the run.tb_every it allows
"""
