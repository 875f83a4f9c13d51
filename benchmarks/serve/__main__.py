from benchmarks.serve.harness import main

raise SystemExit(main())
