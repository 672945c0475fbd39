from sendd.cli import main

raise SystemExit(main())
