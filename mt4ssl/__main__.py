from mt4ssl.cli import main

raise SystemExit(main())
