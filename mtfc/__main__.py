from mtfc.cli import main

raise SystemExit(main())
