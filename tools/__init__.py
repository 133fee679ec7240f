"""What users and developers run beside the harness, from a clone (not shipped in the wheel): the random fault
campaign, hyper-parameter tuning on the validation split, the Slurm test cluster script. The harness never imports
tools/."""
