from odst.cli import main

raise SystemExit(main())
