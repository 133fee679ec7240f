"""The README's own-recipe example (section "Your own recipe"): a smoke-sized table of the user's, with its own
claim (tests/test_cli.py runs it from an installed wheel; tests/test_recipe_path.py composes it)."""

USER_RECIPE = """\
defaults:
  - table_schema
  - _self_
  - launcher: local
  - profile: smoke
table: mine
title: "Does 90% masking beat the MAE baseline?"
rows:
  mae: {label: "MAE baseline", method: mae}
  d90: {label: "DMAE at 90% masking", method: dmae, pretrain: {mask_ratio: 0.9}}
  scratch: {label: "from random initialisation", method: scratch}
claims:
  - {id: d90_beats_mae, text: "DMAE at 90% masking beats MAE", a: [d90], b: [mae], test: greater, margin: 0.0,
     source: user, note: "my hypothesis"}
"""
