from sidegate.proxy.cli import main

raise SystemExit(main())
