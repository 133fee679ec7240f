from harness.report.markdown import main

raise SystemExit(main())
